"""ImageGeometry: NIfTI and LPS conversions, spacing/origin/direction of oblique affines, invalid affines."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_mamba_seg.io import ImageGeometry


def rotation(angles: tuple[float, float, float]) -> np.ndarray:
    """A proper rotation (det +1) about x, then y, then z by ``angles`` radians."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_nifti_affine(seed: int) -> np.ndarray:
    """A random oblique, anisotropic NIfTI affine with a flipped axis (as many scanners write)."""
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    direction = rotation(tuple(rng.uniform(-0.6, 0.6, 3))) @ np.diag([-1.0, 1.0, 1.0])
    affine[:3, :3] = direction * rng.uniform(0.3, 3.0, 3)[None, :]
    affine[:3, 3] = rng.uniform(-200, 200, 3)
    return affine


@pytest.mark.parametrize("seed", range(5))
def test_nifti_affine_round_trip_is_exact(seed: int) -> None:
    nifti = oblique_nifti_affine(seed)
    geometry = ImageGeometry.from_nifti_affine(nifti)
    assert np.array_equal(geometry.nifti_affine(), nifti)
    assert ImageGeometry.from_nifti_affine(geometry.nifti_affine()) == geometry


def test_array_index_and_nifti_voxel_reach_the_same_world_point() -> None:
    nifti = oblique_nifti_affine(7)
    geometry = ImageGeometry.from_nifti_affine(nifti)
    voxel_ijk = np.array([3.0, 11.0, 5.0])
    world_from_nifti = nib.affines.apply_affine(nifti, voxel_ijk)
    world_from_array = nib.affines.apply_affine(geometry.affine, voxel_ijk[::-1])  # array order (k, j, i)
    np.testing.assert_allclose(world_from_array, world_from_nifti, rtol=0, atol=1e-12)


def test_lps_affine_negates_right_and_anterior_and_round_trips() -> None:
    geometry = ImageGeometry.from_nifti_affine(oblique_nifti_affine(3))
    lps = geometry.lps_affine()
    index = np.array([4.0, 2.0, 9.0, 1.0])
    ras_point = geometry.affine @ index
    lps_point = lps @ index
    np.testing.assert_array_equal(lps_point[:3], ras_point[:3] * np.array([-1.0, -1.0, 1.0]))
    assert ImageGeometry.from_lps_affine(lps) == geometry


def test_lps_is_3d_only() -> None:
    with pytest.raises(ValueError, match="3D"):
        ImageGeometry(np.diag([0.5, 0.5, 1.0])).lps_affine()


def test_spacing_origin_direction_of_a_rotated_oblique_affine() -> None:
    direction = rotation((0.3, -0.2, 0.5))
    spacing = (3.0, 0.8, 0.6)
    origin = (-12.5, 40.25, 7.0)
    geometry = ImageGeometry.from_spacing(spacing, origin, direction)
    np.testing.assert_allclose(geometry.spacing, spacing, rtol=1e-14)
    assert geometry.origin == origin
    np.testing.assert_allclose(geometry.direction, direction, atol=1e-14)
    np.testing.assert_allclose(geometry.direction.T @ geometry.direction, np.eye(3), atol=1e-14)
    index = np.array([2.0, 5.0, 7.0])
    expected = np.asarray(origin) + direction @ (np.asarray(spacing) * index)
    np.testing.assert_allclose(geometry.affine[:3, :3] @ index + geometry.affine[:3, 3], expected, atol=1e-12)
    # NIfTI voxel sizes are the array spacings reversed: nibabel agrees.
    np.testing.assert_allclose(nib.affines.voxel_sizes(geometry.nifti_affine()), spacing[::-1], rtol=1e-14)


def test_two_dimensional_geometry_gets_one_slice_in_nifti() -> None:
    geometry = ImageGeometry.from_spacing((0.5, 0.25), origin=(10.0, -3.0))
    nifti = geometry.nifti_affine()
    np.testing.assert_array_equal(nifti[:2, :2], [[0.0, 0.5], [0.25, 0.0]])  # columns reversed: (i, j) = (x, y)
    np.testing.assert_array_equal(nifti[:3, 3], [10.0, -3.0, 0.0])
    assert nifti[2, 2] == 1.0


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([1.0, 0.0, 1.0, 1.0]),  # zero spacing
        np.array([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]),  # collinear axes
        np.diag([1.0, np.nan, 1.0, 1.0]),
        np.diag([1.0, 1.0, np.inf, 1.0]),
        np.eye(5),
    ],
    ids=["zero-spacing", "collinear", "nan", "inf", "5x5"],
)
def test_invalid_affines_are_refused(affine: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"singular|NaN|must be"):
        ImageGeometry(affine)


def test_from_nifti_affine_needs_four_by_four() -> None:
    with pytest.raises(ValueError, match="4×4"):
        ImageGeometry.from_nifti_affine(np.eye(3))


def test_geometry_is_immutable_and_compares_bitwise() -> None:
    source = oblique_nifti_affine(1)
    geometry = ImageGeometry.from_nifti_affine(source)
    source[0, 0] = 99.0  # the geometry holds its own copy
    assert geometry.affine[0, 2] != 99.0
    with pytest.raises(ValueError):
        geometry.affine[0, 0] = 1.0
    nudged = geometry.affine.copy()
    nudged[0, 3] += 1e-9
    assert ImageGeometry(nudged) != geometry
    assert ImageGeometry(nudged).is_close(geometry)
